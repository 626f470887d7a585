"""The model as the stream sees it: the meta-device skeleton with blocks loaded one at a time
(skeleton), the weight matrices of a block and their roles (matrices), which matrices a run prunes
(selection), the LM head pruned apart (lm_head), a Mixture-of-Experts block's routed experts run a group
at a time (expert_groups), and the device and tokenizer a run uses (loading).

Imports: config, disk/ and runtime/.
"""
