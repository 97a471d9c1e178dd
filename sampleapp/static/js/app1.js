// Carousel sample script 1: marks that it loaded.
document.documentElement.dataset.script1 = 'loaded';
