"""ex4d.depth"""
