"""The control plane (zenoh, or an in-memory twin) and the data plane's framing."""
