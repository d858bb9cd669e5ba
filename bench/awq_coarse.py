"""AWQ's alpha search: every alpha of the grid of 20 against the coarse-to-fine search (`coarse=2`), on the course model.

For every block of the course model, as `awq_model` walks it (float inputs, the full grid's factors folded in), each
group's search runs twice on the same inputs and recorded call: over all 20 alphas, and with `coarse=2` (the ten even
alphas, then the odd ones beside the best of them). Recorded per group: both alphas, the loss of each pick on the full
grid, how many alphas each search measured and its seconds; and the whole pass's seconds. Chapter 05 reads the JSON:
its CPU run at the small budget searches with `coarse=2`, the GPU runs at the full budget with every alpha.
Writes a JSON naming the machine, the commit and the time (benchmeta.run_metadata) to --out
(default bench/results/awq_coarse.json). On the CPU at the small budget it takes about 5 minutes.
Usage: python bench/awq_coarse.py [--budget small] [--bits 4] [--group-size 64] [--out FILE]
"""
import argparse, copy, inspect, json, time
from pathlib import Path
import torch
from quantcourse.core import load_model, get_budget, calibration_samples, default_device
import quantcourse.awq as awq

from benchmeta import run_metadata, sync


def compare(model, calibration, bits: int, group_size: int, coarse: int, device) -> tuple[list, float]:
    "Rows of (block, group, full and coarse searches), and the seconds of the whole pass."
    rows, search = [], awq.search_scale
    def both(*args, **kwargs):
        call = inspect.signature(search).bind(*args, **kwargs); call.apply_defaults()
        settings, timed = call.arguments, {}
        for name, step in (('full', 1), ('coarse', coarse)):
            sync(device); start = time.perf_counter()
            timed[name] = search(**(settings | dict(coarse=step)))
            sync(device); timed[name] += (time.perf_counter() - start,)
        label, group = settings['label'], settings['group']
        (_, alpha, losses, full_s), (_, picked, tried, coarse_s) = timed['full'], timed['coarse']
        rows.append(dict(block=label.rstrip('.'), group=group.inspect, alpha_full=alpha, alpha_coarse=picked,
                         loss_full=losses[round(alpha * len(losses))], loss_coarse=losses[round(picked * len(losses))],
                         measured_coarse=sum(t is not None for t in tried), measured_full=len(losses),
                         seconds_full=full_s, seconds_coarse=coarse_s))
        return timed['full'][:3]
    awq.search_scale = both
    try:
        start = time.perf_counter()
        awq.awq_model(model, calibration, progress=True, grid=20, bits=bits, group_size=group_size)
        return rows, time.perf_counter() - start
    finally: awq.search_scale = search


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--budget', default='small')
    parser.add_argument('--bits', type=int, default=4)
    parser.add_argument('--group-size', type=int, default=64)
    parser.add_argument('--coarse', type=int, default=2)
    parser.add_argument('--out', type=Path, default=Path(__file__).parent / 'results' / 'awq_coarse.json')
    args = parser.parse_args()
    budget, device = get_budget(args.budget), default_device()
    model, tokenizer = load_model(); model.eval()
    calibration = calibration_samples(tokenizer, budget.calib_samples, budget.calib_seq_len)
    rows, seconds = compare(copy.deepcopy(model).to(device), calibration.to(device), args.bits, args.group_size,
                            args.coarse, device)
    same = sum(r['alpha_full'] == r['alpha_coarse'] for r in rows)
    print(f"{same} of {len(rows)} groups: the same alpha; searches {sum(r['seconds_full'] for r in rows):.0f} s "
          f"with every alpha, {sum(r['seconds_coarse'] for r in rows):.0f} s coarse-to-fine")
    result = run_metadata(device) | dict(benchmark='awq_coarse', budget=budget.name, bits=args.bits,
                                         group_size=args.group_size, grid=20, coarse=args.coarse,
                                         threads=torch.get_num_threads(), pass_seconds=seconds, groups=rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + '\n')
    print(f"wrote {args.out}")


if __name__ == '__main__':
    main()
