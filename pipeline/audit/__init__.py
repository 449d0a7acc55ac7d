"""`bancache inspect`: statistics of a store, teacher fitness, and the files they are written to."""
