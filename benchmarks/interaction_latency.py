"""How fast view-only interactions redraw in a real browser: a layer step and a channel step, per model.

    python -m benchmarks.interaction_latency [--models resnet50.tv_in1k ...] [--steps 8]

With the models' results computed (224, the sample image), for every model: click "layer ▶" and time
until the channel grid shows the next layer; click the channel input's increment and time until the
next channel is drawn. Medians over ``--steps`` steps. Goal: <= 0.25 s.
"""
from __future__ import annotations

import argparse
import statistics

from t2t_viz.zoo import PRESETS

from .browser import app_server, choose, chromium_page

_GRID = '[data-testid="stMain"] [data-testid="stImage"] img'
# Runs in the page: click, then wait (each animation frame) until the new picture is decoded; the time is
# taken by the browser's own clock, from the click to that frame.
_CLICK_UNTIL = """async ([button, imageIndex, caption]) => {
    const images = () => document.querySelectorAll('[data-testid="stMain"] [data-testid="stImage"] img');
    const before = images()[imageIndex].getAttribute('src');
    const scope = button === 'Increment'  // the channel input's, not a number input of the sidebar
        ? [...document.querySelectorAll('[data-testid="stMain"] [data-testid="stNumberInput"]')]
              .find(n => n.innerText.trim().startsWith('Channel')) : document;
    const target = [...scope.querySelectorAll('button')].find(b => b.innerText.trim() === button
                                                                || b.getAttribute('aria-label') === button);
    if (!target) throw new Error('no button ' + button);
    const start = performance.now();
    target.click();
    await new Promise((resolve, reject) => {
        const check = () => {
            if (performance.now() - start > 30000) reject(new Error('no new picture 30 s after ' + button));
            const image = images()[imageIndex];
            const captions = [...document.querySelectorAll('[data-testid="stImageCaption"]')].map(c => c.textContent);
            const ready = image && image.getAttribute('src') !== before && image.complete && image.naturalWidth > 0;
            if (ready && (!caption || captions.includes(caption))) resolve(); else requestAnimationFrame(check);
        };
        check();
    });
    return (performance.now() - start) / 1000;
}"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', default=list(PRESETS['paper']))
    parser.add_argument('--steps', type=int, default=8)
    args = parser.parse_args()
    env = {'T2T_VIZ_MODELS': ','.join(args.models), 'T2T_VIZ_OFFLINE': '1'}
    with app_server(env) as (url, _, _), chromium_page() as page:
        page.goto(url)
        page.get_by_text('Results for chelsea.png').wait_for(timeout=600_000)
        page.locator(_GRID).first.wait_for(timeout=600_000)
        print(f"{'model':<42}{'layer step s':>14}{'channel step s':>16}")
        for name in args.models:
            choose(page, 'Model', name)
            page.wait_for_timeout(1500)
            page.wait_for_timeout(1500)
            layer_times = [page.evaluate(_CLICK_UNTIL, ['layer ▶', 0, None]) for _ in range(args.steps)]
            channel_times = []
            for _ in range(args.steps):
                channel = int(page.get_by_label('Channel', exact=True).input_value()) + 1
                channel_times.append(page.evaluate(_CLICK_UNTIL, ['Increment', 1, f'channel {channel}']))
            print(f'{name:<42}{statistics.median(layer_times):>14.3f}{statistics.median(channel_times):>16.3f}',
                  flush=True)


if __name__ == '__main__':
    main()
