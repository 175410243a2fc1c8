// Follow the system's light or dark mode (Bootstrap 5.3 colour modes). Loaded in
// <head>, before the page is drawn, so that a dark page never flashes white.
(function () {
  "use strict";
  var dark = window.matchMedia && window.matchMedia("(prefers-color-scheme: dark)");
  function apply() {
    document.documentElement.setAttribute("data-bs-theme", dark && dark.matches ? "dark" : "light");
  }
  apply();
  if (dark && dark.addEventListener) {
    dark.addEventListener("change", apply);
  }
})();
