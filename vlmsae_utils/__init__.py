"""vlmsae helper package."""
