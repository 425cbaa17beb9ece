"""One module per ``edgetok`` subcommand."""
