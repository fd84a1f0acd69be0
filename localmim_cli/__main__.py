from localmim_cli.cli import main

main()
