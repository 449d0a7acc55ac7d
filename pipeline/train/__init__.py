"""Training one generation: the loop, its two input paths, schedules, controls."""
