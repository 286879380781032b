"""glmserve.proto"""
