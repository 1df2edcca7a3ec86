"""Command lines: sgm-train, sgm-sample, sgm-convert, sgm-demo (console scripts; the top-level
train.py / sample.py / convert_torch_weights.py / demo.py of a source checkout call the same)."""
