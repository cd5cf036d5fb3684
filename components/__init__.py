"""Steps of the NYC rental-price pipeline: pure logic modules plus thin KFP components (steps.py)."""
