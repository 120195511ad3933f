"""Losses as pure functions first (CARB), thin modules second."""
