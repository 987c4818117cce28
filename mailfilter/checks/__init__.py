"""The checks, one module per family. Each takes a `ParsedMessage` and returns findings."""
