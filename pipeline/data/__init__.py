"""The prepared dataset file, the sources it is prepared from, and the uint8 image augmentation."""
