"""Launchers start processes and hand them to the one training loop; they hold no training logic."""
