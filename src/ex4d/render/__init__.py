"""ex4d.render"""
