"""The Ray layer: one module per stage, each a thin driver over ``tclora``."""
