"""LIAM analytics as the seed program imports it; the code lives in services.liam."""
