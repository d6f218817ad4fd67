// The site's one script (no inline script: see the Content-Security-Policy).
// - [data-reveal=ID] buttons show and hide a secret (the MLflow password).
// - [data-poll=URL] regions are refreshed from a JSON endpoint
//   ({status, terminal, html}) every data-interval ms until terminal.
(function () {
  "use strict";

  function reveal(button) {
    var target = document.getElementById(button.getAttribute("data-reveal"));
    if (!target) return;
    var shown = target.hidden;
    target.hidden = !shown;
    button.setAttribute("aria-expanded", String(shown));
    button.textContent = shown ? "Hide password" : "Show password";
  }

  function poll(region) {
    var url = region.getAttribute("data-poll");
    var interval = parseInt(region.getAttribute("data-interval"), 10) || 3000;
    var failures = 0;
    function tick() {
      fetch(url, {credentials: "same-origin", headers: {"Accept": "application/json"}})
        .then(function (response) {
          if (!response.ok) throw new Error("HTTP " + response.status);
          return response.json();
        })
        .then(function (data) {
          failures = 0;
          var focused = document.activeElement && region.contains(document.activeElement);
          region.innerHTML = data.html;  // rendered and escaped by the server
          region.setAttribute("data-status", data.status);
          if (data.terminal) {
            region.removeAttribute("data-poll");
            if (focused) region.focus();
            return;
          }
          setTimeout(tick, interval);
        })
        .catch(function () {
          failures += 1;  // the server restarting, the network: back off, keep going
          setTimeout(tick, Math.min(60000, interval * Math.pow(2, failures)));
        });
    }
    setTimeout(tick, interval);
  }

  document.addEventListener("click", function (event) {
    var button = event.target.closest("[data-reveal]");
    if (button) reveal(button);
  });
  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("[data-poll]").forEach(poll);
  });
})();
