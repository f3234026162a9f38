"""Dataset layouts, label I/O, frame containers, datasets and the demo-data generator."""
