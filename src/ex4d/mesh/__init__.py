"""ex4d.mesh"""
