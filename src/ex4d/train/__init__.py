"""ex4d.train"""
