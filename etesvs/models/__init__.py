"""Neural networks: shared temporal-convolution blocks (tcn), the two-stage baselines on per-frame features
(mstcn, asrf, asformer, frame_classifier), the I3D feature extractor and the streaming model."""
