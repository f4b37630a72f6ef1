"""Runs models on this node: loading, the decode scheduler, and (later) stage runners."""
