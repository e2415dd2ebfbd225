"""Demo data for the CTR recommender: synthetic click data and simulated scoring traffic."""
