"""Building blocks shared by the methods: segmenters (encoder E + classifier C), losses, optimisation helpers."""
