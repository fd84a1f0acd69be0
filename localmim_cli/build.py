"""Assembles a LocalMIM model from settings, looking encoder and target up by plugin name."""

from __future__ import annotations

from pydantic import BaseModel

from localmim_cli import registry
from localmim_cli.model import DecoderShape, LocalMIM, cell_sizes
from localmim_cli.settings import ModelSettings


def encoder_options(settings: ModelSettings) -> BaseModel:
    return registry.encoder(settings.encoder.name).options.model_validate(settings.encoder.options)


def target_options(settings: ModelSettings) -> BaseModel:
    return registry.target(settings.target.name).options.model_validate(settings.target.options)


def build_model(settings: ModelSettings) -> LocalMIM:
    """Raises ValueError (bad combination) or registry.PluginError (missing/broken plugin)."""
    enc_plugin = registry.encoder(settings.encoder.name)
    encoder = enc_plugin.build(encoder_options(settings), settings.img_size, settings.taps or None)
    cells = cell_sizes(encoder, settings.scales)
    target = registry.target(settings.target.name).build(target_options(settings), cells)
    d = settings.decoder
    width = d.width if isinstance(d.width, int) else tuple(d.width)
    return LocalMIM(encoder, target, settings.scales, DecoderShape(width, d.depth, d.num_heads, d.mlp_ratio),
                    settings.mask_ratio, settings.layer_norm_eps)
