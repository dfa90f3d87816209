"""``posttrain plan``: which tuning path fits a GPU, and the predicted peak memory of every tuning mode."""
