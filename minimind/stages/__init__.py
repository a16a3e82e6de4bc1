"""Training stages. Each says only what is special about it: its data and its loss."""
