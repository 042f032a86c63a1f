"""ex4d.io"""
