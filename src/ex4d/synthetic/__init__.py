"""ex4d.synthetic"""
