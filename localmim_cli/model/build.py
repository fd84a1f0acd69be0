"""Assembles a LocalMIM model from settings, looking encoder and target up by plugin name."""

from __future__ import annotations

from pydantic import BaseModel

from localmim_cli.plugins import registry
from localmim_cli.model.localmim import DecoderShape, LocalMIM, cell_sizes
from localmim_cli.config.schema import ModelSettings
from localmim_cli.errors import ModelError


def encoder_options(settings: ModelSettings) -> BaseModel:
    return registry.encoder(settings.encoder.name).options.model_validate(settings.encoder.options)


def target_options(settings: ModelSettings) -> BaseModel:
    return registry.target(settings.target.name).options.model_validate(settings.target.options)


def build_model(settings: ModelSettings) -> LocalMIM:
    """Raises ModelError (settings that do not fit together) or PluginError (missing/broken plugin)."""
    enc_plugin = registry.encoder(settings.encoder.name)
    encoder = enc_plugin.build(encoder_options(settings), settings.img_size, settings.taps or None)
    d = settings.decoder
    width = d.width if isinstance(d.width, int) else tuple(d.width)
    try:
        cells = cell_sizes(encoder, settings.scales)
        target = registry.target(settings.target.name).build(target_options(settings), cells)
        return LocalMIM(encoder, target, settings.scales, DecoderShape(width, d.depth, d.num_heads, d.mlp_ratio),
                        settings.mask_ratio, settings.layer_norm_eps)
    except ModelError:
        raise
    except ValueError as exc:   # the model's own checks of taps, scales and sizes
        raise ModelError(f"model settings: {exc}") from exc
