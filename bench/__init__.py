"""glmserve.bench"""
