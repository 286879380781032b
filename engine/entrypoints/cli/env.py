"""Environment variables the ``glmserve`` command reads."""

API_KEY_ENV = "GLMSERVE_API_KEY"   # the serve command's --api-key, and the chat client's key
