"""The command layer: each module turns a config into one `saefeat` command; the library never imports it."""
