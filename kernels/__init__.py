"""glmserve.kernels"""
