"""The model as the stream sees it: the meta-device skeleton with blocks loaded one at a time
(skeleton), the weight matrices of a block and their roles (matrices), which matrices a run prunes
(selection), and the LM head pruned apart (lm_head).

Imports: config, disk/ and runtime/.
"""
