"""The replicated cluster state: State, pure apply, ordered buffer, journal and store."""
