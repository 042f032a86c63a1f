"""ex4d.diffusion"""
