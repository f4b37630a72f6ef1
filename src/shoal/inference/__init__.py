"""Generation: one internal request type, sampling, stop handling, the decode scheduler."""
