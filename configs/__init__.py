"""The YAML configs, installed as the `saefeat.configs` package (read with `saefeat.config.configs_dir()`)."""
