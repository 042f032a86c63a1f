"""ex4d.eval"""
