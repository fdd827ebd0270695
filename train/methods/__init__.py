"""Pre-training methods, one file each. A method says how views are made, what the loss is and
what happens after an optimizer step; the loop (:mod:`train.pretrain`) knows nothing else about it.
The contract is :class:`train.methods.base.Method`."""
