"""DeepSpeed-Chat compatibility: what a DeepSpeed-Chat user brings along, accepted as it is.

    args.py        the flags DeepSpeed's launcher and `deepspeed.add_config_arguments` add to
                   every DeepSpeed-Chat command (--deepspeed, --deepspeed_config, --local_rank...)
    checkpoint.py  DeepSpeed-Chat's output folders (pytorch_model.bin + config.json): loading
                   them as chatrl models, and exporting chatrl models in that layout
    export.py      `chatrl export --format dschat`
    rw_eval.py, prompt_eval.py, chat.py
                   DeepSpeed-Chat's evaluation and chat command forms, as
                   `python -m chatrl.dschat.rw_eval ...` etc., mapped onto chatrl's commands

docs/migrating-from-deepspeed-chat.md maps every DeepSpeed-Chat command onto chatrl's.
"""
