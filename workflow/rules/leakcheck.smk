# The automatic future-leak check of every trained checkpoint (perturbation + prefix consistency).
# A failing row is marked in the report and left out of comparisons. A model with nested
# sub-models (fractalformer) has each of them checked as well, into the same file.


rule leak_check:
    input:
        data_inputs,
        weights=f"{RUN}/model.safetensors",
        model_config=f"{RUN}/model_config.json",
    output:
        f"{RUN}/leak_check.json",
    params:
        data=data_dir,
        run=RUN,
    threads: SUITE.threads
    resources:
        gpu=int(SUITE.gpu),
    log:
        f"{RUN}/leak_check.log",
    shell:
        "{ARCHBENCH} leakcheck --run {params.run} --data {params.data} --out {output} "
        "--threads {threads} 2> {log}"
