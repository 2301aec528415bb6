"""The world model: block-wise SSM layers, frame-local attention and the backbone built from them."""
