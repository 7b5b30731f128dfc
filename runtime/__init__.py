"""Device side: the elastic model that runs any rate of a nested checkpoint (and, for now, answering a prompt)."""
