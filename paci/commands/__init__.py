"""One module per subcommand, each with `add_<name>_parser(subparsers)` and `<name>_command(args) -> int`."""
