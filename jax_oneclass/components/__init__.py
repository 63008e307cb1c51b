"""Parts several methods share: backbones and their weights, one-class
classifiers, nearest-neighbour search, anomaly maps, layers."""
