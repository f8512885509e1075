"learnkit: train PyTorch models the fastai way."
