"""ex4d.camera"""
