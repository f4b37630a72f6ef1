"""Model metadata: the builtin TOML cards and the catalog that reads them."""
